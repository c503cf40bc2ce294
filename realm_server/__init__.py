"""Realm's application layer on top of the runtime (`realm_wasm`): the `realm` command (`cli.py`)
and the Starlette server, which serves the page, Pyodide and model files (`static.py`) and the
inference API (`service.py` without transport, `http.py`, `ws.py`, assembled by `app.py`)."""
