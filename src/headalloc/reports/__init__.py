"""Reports: figures drawn from stored results, and the HTML report of `headalloc reproduce`."""
