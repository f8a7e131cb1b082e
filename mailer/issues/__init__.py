"""Issues: when digests are due (schedule), making an issue (create), how an issue stands and
cancel/resume/retry (progress), staff's preview and opening of the next issue (staff), the
public archive."""
