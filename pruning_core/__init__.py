"""dataset-pruning core library: data sources, models, training, influence, selection and
dataset versions. Pure numpy/torch/pyarrow/deltalake; never imports prefect or dask."""

__version__ = "0.1.0"
