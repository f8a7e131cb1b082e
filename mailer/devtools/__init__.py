"""Development tools: the capture SMTP server (sink) and the demo with its example articles
and subscribers."""
