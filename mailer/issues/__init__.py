"""Issues: when digests are due (schedule), making an issue (create), how an issue stands and
cancel/resume/retry (progress), the next scheduled issue as content (nextissue) and whose copy
of it staff see (sample), staff's preview and opening of the next issue (staff), the public
archive."""
