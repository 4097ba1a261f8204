"""Hydra configuration files of bilevel (a package so installed copies find them)."""
