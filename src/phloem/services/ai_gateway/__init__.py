"""The AI Gateway (issue 15): an OpenAI-compatible endpoint per branch that forwards to
the operator's upstreams and counts usage per branch and function."""
