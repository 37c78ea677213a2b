"""Using the models live: streamed chat and the blind arena's web server.

Owns streaming answers (``chat``), the arena's generation worker (``arena_engine``), its web
app and page (``arena_app``, ``arena_page/``), the server that loads the models and serves it
(``arena_server``), the page's ratings table (``arena_ratings``) and votes -> preference pairs
(``arena_export``).
Imports ``core``, ``models``, ``data`` and ``evaluate``.
"""
