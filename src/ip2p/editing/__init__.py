"""`ip2p edit`: edit images from the command line with any editor (preset, folder, checkpoint file
or registry URI). The sampler itself is ip2p.models.instruct_pix2pix, shared with every stage."""
