"""Developer tools, not needed to train or run a model: speed benchmarks (``benchmark``),
convergence experiments (``convergence``), metric plots (``metrics_plots``) and the model
report (``model_report``, also logged once by the trainer). The scripts in ``tools/`` are their
command lines. Nothing is imported here, so ``import detr_d2`` stays light."""
