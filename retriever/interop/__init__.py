"""Reading and writing other tools' embedding folders (clip-retrieval)."""
