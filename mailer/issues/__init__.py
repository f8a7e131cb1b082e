"""Issues: the schedule, making an issue, and the staff operations on issues."""
