"""The HTTP edge: only the API process imports this package (`app.api.main:create_app`)."""
