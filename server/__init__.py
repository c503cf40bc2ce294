"""Realm's HTTP server (Starlette): the page, Pyodide and model files (`static`) and the native API."""
