"""`retriever serve`: an HTTP search service (native /v1 API, clip-retrieval's routes, a web page).

from retriever.serve.app import ServeConfig, create_app
app = create_app(ServeConfig(indexes=[("demo", Path("retriever-demo/index"))]))
"""
