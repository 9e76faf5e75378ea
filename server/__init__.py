"""FastAPI server: OpenAI, TEI and KServe v2 routes over one batching engine."""

__version__ = "0.1.0"
