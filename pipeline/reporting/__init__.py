"""Reporting: results read back, the findings, the tables, the cost plan."""
