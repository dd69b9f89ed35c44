"""The authors' selection code, for the reduction tests to run on the same tensors as embedlens's methods.

Each function is the reference's selection code, copied line for line from the
file and lines its docstring names, with only its inputs turned into arguments
(the reference reads them from its model object). The sources are Apache-2.0
licensed (see NOTICE.md here); DivPrune's code is CC BY-NC 4.0, so it is not
copied: its test computes the case by hand from the published algorithm.
"""
