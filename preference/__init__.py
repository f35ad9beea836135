"""Training on preference pairs: reward models (`training.objective=reward`) and DPO (`training.objective=dpo`).

The pairwise losses and the sequence log-probabilities they need are pure functions here; data preparation of the
pairs is `data_pipeline.pairs`' concern, the Trainer that runs them is assembled in `trainer/`.
"""
