"""tunesmith.inference"""
