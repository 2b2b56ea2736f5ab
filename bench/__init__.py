"""Benchmarks (`s2t bench ...`): each measures one part of the product against a peer or a floor in the same run
(model vs transformers and kaldi-native-fbank, the Ray Data job vs the model alone, Serve batched vs unbatched) and
prints ratios. Nothing in production imports this package."""
