"""Tasks on a SQLite file, shared by a worker process and the code that sends them."""
