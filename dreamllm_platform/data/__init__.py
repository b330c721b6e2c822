"""Ray Data ingestion: raw MMC4 / LAION / LLaVA shards -> filtered, VAE-encoded latent store -> training examples.

Modules (each owns one concern):
  config     typed configs (sources, filters, encoder pool, synthetic set, assembly) and the shard config hash
  readers    parsing each format's shards; finding images by name in folders or tar shards
  filters    the drop `Report` and image checks (decode, truncation, bombs, size, aspect)
  shards     one shard -> normalised records + unique images to encode, every drop counted
  store      the latent store layout, manifest and commit protocol
  latents    the precompute pipeline on Ray Data (CPU read tasks -> VAE actor pool -> store)
  assembly   store -> streaming Ray Dataset of tokenised examples + `ExampleCollator`
  synthetic  the coloured-shapes set written in the real formats

Entry points: `latents.run_precompute(PrecomputeConfig)` (jobs/precompute_latents.py) and
`assembly.training_dataset(store_uri, model_cfg)` with `assembly.ExampleCollator(model_cfg)`.
"""
