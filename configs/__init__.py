"""The built-in experiment configs, installed with tx as the package ``tx.configs``: scripts
take ``--config=tx:NAME[:ARG]`` (e.g. ``tx:decoder_lm``, ``tx:ablation:uptrain``) from any
directory, as well as a path to any config file."""
