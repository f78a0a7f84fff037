"""One module (or small package) per stage; `registry.py` lists them: the commands and `inspect` come from it."""
