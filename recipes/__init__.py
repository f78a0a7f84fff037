"""Runnable end-to-end recipes built on the library, one package each (`python -m recipes.shapes`)."""
