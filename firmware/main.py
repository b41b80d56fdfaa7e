# Board entry point (runs after boot.py): start the column controller app.
from firmware import app

app.main()
