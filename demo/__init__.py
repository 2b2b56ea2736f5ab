"""The demo-model toolchain (`s2t corpus`, `s2t train`, `s2t evaluate`): the synthetic spoken-numbers corpus, the
training loop and the scoring that made the bundled model and corpus under s2t_model/assets. Nothing in production
imports this package."""
