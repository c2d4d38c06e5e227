"""tunesmith.benchmarks"""
