"""The global scheduler: a sans-IO core (``core``) and the loop that drives it (``daemon``)."""
