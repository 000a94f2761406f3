"""Federation: databases and files spread over the nodes.

* :mod:`controller.federation.query`: SQL over sharded databases
  (parse → route → rewrite → execute → merge).
"""
