"""Tests of flowtunnel under faults and hostile input (issue 5)."""
