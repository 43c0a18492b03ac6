"""What a person sees: overlays, heatmaps, charts and tables (visual), the steps and layer maps (teach), the
canvas picture's data (viewer), the live preview (preview), the budget animation (animation) and the report
(report). Views import the engine, never the evaluation."""
