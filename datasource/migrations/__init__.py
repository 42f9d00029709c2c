"""Ordered SQL migrations, applied at start-up by ``datasource.db.migrate``."""
