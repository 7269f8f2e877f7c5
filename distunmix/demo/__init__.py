"""``distunmix demo``: the whole product in one command, and the report it writes."""
