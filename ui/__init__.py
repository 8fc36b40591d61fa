"""The seqsal Streamlit workbench (``streamlit run ui/app.py``; ``seqsal up`` starts it).

It talks to the models only through :mod:`seqsal.client` (InferenceService to generate,
SaliencyService to explain); it never loads a model in its own process.
"""
