"""tunesmith.data_preprocess"""
