"""Writing the quantized model: the QDQ build of one assignment (`build`), the graph editor it uses
(`editor`), the integer storage formats and their packing (`formats`), and atomic checked saves
(`save`, staged in a private folder by `staging`)."""
