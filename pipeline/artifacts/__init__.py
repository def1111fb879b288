"""The files the stages write, each writer beside its reader."""
