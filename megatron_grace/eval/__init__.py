"""Evaluation on the Hugging Face side: the GRACE encoder (``encoder``: rationale, then pooled hidden states, as in
training), its MTEB integration (``mteb_eval``) and the offline task suite (``local_suite``)."""
