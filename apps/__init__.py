"""The sc-steer apps, installed as the package ``sc_steer_apps``: the Gradio steering playground
(``playground``) and the run state it serves (``serving``). Start it with ``sc-steer app --run RUN``."""
