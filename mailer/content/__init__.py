"""Content: articles from files (files, site_text, front_matter, fields) and feeds (feeds/), an
article before it is stored (article), the one article store (store), what an issue takes
(selection), and the configured sources that run them (sources)."""
