"""Plugins defined by the tests: importing ``plugins.demo_attack`` registers a third-party-style
attack, which then gets every registry-wide conformance test (tests/test_conformance.py)."""
