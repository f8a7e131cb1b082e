"""Development tools: the capture SMTP server and the demo."""
