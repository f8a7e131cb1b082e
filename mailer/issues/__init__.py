"""Issues: when digests are due (schedule, cron), making an issue (create), how an issue stands
and cancel/resume/retry (progress), staff's preview and send (staff), the public archive."""
