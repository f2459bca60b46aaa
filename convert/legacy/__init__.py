"""The first published SmallDoge layout (no q/k norm, dt per attention head): reading it, exporting it.

`layout` holds the converter's side (published weight names and config keys, the export's config.json);
`configuration_doge_legacy` / `modeling_doge_legacy` are the remote code every such export ships (torch and
transformers only, never imported by the converter itself).
"""
