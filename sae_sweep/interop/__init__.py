"""Import and export of SAEs in other tools' on-disk layouts (SAELens: `sae_sweep.interop.saelens`)."""
