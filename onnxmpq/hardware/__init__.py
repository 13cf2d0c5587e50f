"""Target hardware: bit-width profiles (`profiles`) and the compliance checker that holds any QDQ
model against a profile's rules (`compliance`)."""
