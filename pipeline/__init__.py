"""cxr-screen data pipeline: raw COVIDx-layout images -> manifest -> WebDataset shards."""
