"""Assembly at the edge: a job's parts (data, model, trainer) built once, the same way for a simulation
(``Simulation``) and a deployed arbiter or party (``deploy``), and the run folder they write."""
