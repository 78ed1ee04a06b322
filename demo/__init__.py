"""The Gradio demo (`diffaccel demo`, or `python demo/app.py`); installed as `diffaccel.demo`. Needs the
`demo` extra: `pip install -e ".[demo]"`."""
