"""The engine: one measured run (pipeline), the cuts inside the LLM (llm), computed cost (cost), clocks and
memory (measure), checked image loading (images) and the drift of a reduced answer (fidelity). It imports
`explorer.core` and `explorer.methods`, never the views or the evaluation."""
