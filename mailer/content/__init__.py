"""Content: article files, feeds, sources and the article store."""
