"""ROUGE (`rouge`: evaluate's metric, shipped in `rouge/rouge.py`), a split's scores with n and intervals
(`scoring`) and the cluster bootstrap (`bootstrap`)."""
