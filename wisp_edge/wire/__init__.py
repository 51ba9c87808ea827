"""What the edge and the verifier both speak, defined once: the round protocol, sampling semantics, the
vocabulary fingerprint, chat templates, incremental detokenizing, the OpenAI text format and the error
type. Needs neither torch, FastAPI nor llama.cpp (numpy, pydantic and jinja2 only), so the cloud imports
it and an edge install stays light."""
